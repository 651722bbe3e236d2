"""`python -m mistral_nemo ...`: the `mistral-nemo` command, as torchrun launches it
(`torchrun --nproc-per-node 2 -m mistral_nemo generate --tp 2 ...`)."""

import sys

from mistral_nemo.cli import main

sys.exit(main())
