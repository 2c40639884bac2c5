"""Models and data this project did not make: a user's image folders and `.npz` files (`data`), a
user's model factory and weights, admitted only through a `CodeAllowance` the command line builds
(`models`), and the two put together for `launder`, `run` and `audit` (`setup`: `ExternalModel`,
`load_external`). Bring-your-own laundering itself is `nnlaunder/byo.py`."""
