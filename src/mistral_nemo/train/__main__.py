"""`python -m mistral_nemo.train [CONFIG.yaml] [key=value ...]`: `mistral-nemo train`, the
entry point torchrun launches (`torchrun --nproc-per-node N -m mistral_nemo.train ...`)."""

import sys

from mistral_nemo.cli import main

sys.exit(main(["train", *sys.argv[1:]]))
