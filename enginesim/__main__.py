"""``python -m enginesim``: run N simulated vLLM engines (see ``enginesim.cli``)."""

from __future__ import annotations

import sys

from enginesim.cli import main

sys.exit(main())
