"""Runs IBM ART 1.20's Neural Cleanse on the Table 5 MNIST model, in the bench-only virtual
environment (tensorflow-cpu + adversarial-robustness-toolbox; never the package's own).

    /path/to/bench-venv/bin/python benchmarks/perf/art_nc.py IN.npz OUT.npz

IN.npz (written by benchmarks/perf/run.py): the model's weights (PyTorch layout), the images
(N,28,28,1 float in [0,1]), the PyTorch logits of those images, steps, batch size, threads.
The Keras model is rebuilt layer by layer with those weights and must give the same logits.
Known ART defects handled here and reported, not hidden:
  1. under Keras 3, `KerasNeuralCleanse.reset()` zeroes every optimiser variable, the learning
     rate included, so every class after the first would not move: the harness restores it;
  2. its early stop never fires (the cost-reset branch clears both flags it waits for);
  3. it prints a tensor per minibatch: run.py sends this script's stdout to a file.
"""

import sys
import time

import numpy as np


def main() -> int:
    inp, out = sys.argv[1], sys.argv[2]
    z = np.load(inp)
    threads = int(z["threads"])
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    import keras
    from art.estimators.poison_mitigation.neural_cleanse.keras import KerasNeuralCleanse

    mean, std = float(z["mean"]), float(z["std"])
    model = keras.Sequential([
        keras.Input((28, 28, 1)),
        keras.layers.Rescaling(1.0 / std, offset=-mean / std),
        keras.layers.Conv2D(32, 5, activation="relu"), keras.layers.MaxPooling2D(2),
        keras.layers.Conv2D(16, 5, activation="relu"), keras.layers.MaxPooling2D(2),
        keras.layers.Flatten(), keras.layers.Dense(512, activation="relu"), keras.layers.Dense(10)])
    conv1, conv2, fc1, fc2 = (model.layers[i] for i in (1, 3, 6, 7))
    conv1.set_weights([z["c1w"].transpose(2, 3, 1, 0), z["c1b"]])
    conv2.set_weights([z["c2w"].transpose(2, 3, 1, 0), z["c2b"]])
    # torch flattens (C,H,W), Keras (H,W,C): reorder fc1's input rows
    w = z["f1w"].reshape(512, 16, 4, 4).transpose(2, 3, 1, 0).reshape(256, 512)
    fc1.set_weights([w, z["f1b"]])
    fc2.set_weights([z["f2w"].T, z["f2b"]])
    x = z["x"].astype(np.float32)
    logits = model.predict(x, verbose=0)
    max_diff = float(np.abs(logits - z["logits"]).max())
    steps, bs, lr = int(z["steps"]), int(z["batch_size"]), float(z["lr"])
    nc = KerasNeuralCleanse(model=model, use_logits=True, channels_first=False, clip_values=(0.0, 1.0),
                            steps=steps, init_cost=1e-3, norm=1, learning_rate=lr, attack_success_threshold=0.99,
                            patience=5, early_stop=True, early_stop_threshold=0.99, early_stop_patience=25,
                            cost_multiplier=2.0, batch_size=bs)
    calls = {"n": 0}
    train = nc.train

    def counted(*a, **k):
        calls["n"] += 1
        return train(*a, **k)

    nc.train = counted
    reset = nc.reset

    def reset_keeping_lr():                  # defect 1: restore the learning rate the reset zeroed
        reset()
        nc.opt.learning_rate.assign(lr)

    nc.reset = reset_keeping_lr
    y = np.eye(10, dtype=np.float32)[z["y"]]
    masks, patterns, seconds, iters = [], [], [], []
    per_step = len(x) // bs
    for k in range(10):
        calls["n"] = 0
        t0 = time.perf_counter()
        mask, pattern = nc.generate_backdoor(x, y, np.eye(10, dtype=np.float32)[k])
        seconds.append(time.perf_counter() - t0)
        iters.append(calls["n"] // max(per_step, 1))
        masks.append(np.asarray(mask, dtype=np.float32))
        patterns.append(np.asarray(pattern, dtype=np.float32))
        print(f"ART class {k}: {seconds[-1]:.1f} s, {iters[-1]} steps", file=sys.stderr, flush=True)
    np.savez(out, masks=np.stack(masks), patterns=np.stack(patterns), seconds=np.array(seconds),
             iters=np.array(iters), logit_max_diff=max_diff, lr_after_reset=float(nc.opt.learning_rate.numpy()),
             art_version=__import__("art").__version__, tf_version=tf.__version__, keras_version=keras.__version__)
    return 0


if __name__ == "__main__":
    sys.exit(main())
