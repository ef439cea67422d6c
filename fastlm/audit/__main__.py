import sys

from fastlm.audit import main

if __name__ == "__main__":
    sys.exit(main())
