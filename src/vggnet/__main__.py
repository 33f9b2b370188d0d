import sys

from vggnet.cli import main

sys.exit(main())
