"""`python -m fdsl.deploy --model DIR --images IN --out OUT` (see `fdsl.deploy.run`)."""
import sys

from fdsl.deploy.run import main

if __name__ == "__main__":
    sys.exit(main())
