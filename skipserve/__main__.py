from skipserve.cli import main
import sys

sys.exit(main())
