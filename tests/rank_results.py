"""What the multi-process test workers (ring_worker.py, partition_worker.py) share: each rank's results as JSON."""
from __future__ import annotations

import json
import os


def save_rank_results(result_dir: str, rank: int, results: dict) -> None:
    """Write one rank's results to result_dir/rank<rank>.json, where the test reads them."""
    with open(os.path.join(result_dir, f"rank{rank}.json"), "w") as handle:
        json.dump(results, handle)
