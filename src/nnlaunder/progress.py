"""Progress bars drawn at the edges: the algorithms report events through callbacks
(`launder(on_progress=...)`), the CLI and the experiment runner turn them into tqdm bars."""

from __future__ import annotations

from tqdm.auto import tqdm


class LaunderBars:
    """An `on_progress(stage, round, step, count)` callback for `launder` that draws one bar per
    stage and round: Neural Cleanse counts epochs without a total (early stopping ends it long
    before its maximum, so an ETA would mislead) and shows the classes still optimised; retraining
    counts epochs of a known total."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self._bar: tqdm | None = None
        self._key: tuple[str, int] | None = None

    def __call__(self, stage: str, rnd: int, step: int, count: int) -> None:
        if not self.enabled:
            return
        if self._key != (stage, rnd):
            self.close()
            self._key = (stage, rnd)
            if stage == "nc":
                self._bar = tqdm(desc=f"neural cleanse r{rnd} (epochs)", leave=False, mininterval=1.0, unit="epoch")
            else:
                self._bar = tqdm(desc=f"{stage} r{rnd}", total=count, leave=False, mininterval=1.0, unit="epoch")
        assert self._bar is not None
        self._bar.n = step
        if stage == "nc":
            self._bar.set_postfix(classes_left=count, refresh=False)
        self._bar.refresh()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        self._bar, self._key = None, None
