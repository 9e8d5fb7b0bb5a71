"""``python -m lpbq_tvm``: the same command line as ``lpbq-tvm``."""

import sys

from lpbq_tvm.cli import main

sys.exit(main())
