import sys

from fleetd.holder.program import main

sys.exit(main())
