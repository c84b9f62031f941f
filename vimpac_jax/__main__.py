import sys

from vimpac_jax.cli import main

# The guard matters: worker processes started with 'spawn' (video decoding) import the parent's
# main module again, as "__mp_main__"; unguarded, each would run the command line once more.
if __name__ == "__main__":
    sys.exit(main())
