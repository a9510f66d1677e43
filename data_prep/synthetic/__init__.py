"""A bundled synthetic visual world: pictures, detector-like regions and text for every task.

    python -m data_prep.synthetic --out data/synthetic          # generate (about 30 s)
    python -m data_prep.synthetic --preview data/synthetic --out sheet.png

From code, `ensure_dataset(path)` generates the default world on first use and reuses it after;
`ensure_world(path)` (what main.py hands the trainer) reuses any complete world.
See docs/synthetic_world.md.
"""

from data_prep.synthetic.world import Config
from data_prep.synthetic.writer import (GENERATOR_VERSION, ensure_dataset, ensure_world, generate,
                                        read_world_manifest)

__all__ = ["Config", "GENERATOR_VERSION", "ensure_dataset", "ensure_world", "generate",
           "read_world_manifest"]
