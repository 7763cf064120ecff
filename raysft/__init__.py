"""raysft: Ray Tune + Optuna hyperparameter search for supervised fine-tuning (README.md)."""

from raysft.thirdparty import install_bitsandbytes_hook

install_bitsandbytes_hook()  # every raysft process: the driver, Ray's workers, the CLIs
