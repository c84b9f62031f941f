import sys

from vimpac_jax.cli import main

sys.exit(main())
