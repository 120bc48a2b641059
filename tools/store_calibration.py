"""Store a fitted temperature with a shipped model, so its probabilities are usable by default.

    diffusion-classifier evaluate --data fashion-mnist --split train --subset FILE --model NAME --out RUN ...
    diffusion-classifier calibrate RUN
    python tools/store_calibration.py NAME RUN

Writes model_index.json's "calibration" block: the temperature and what it was fitted on (split,
images, strategy, prompts, scoring settings) with the held-out NLL and ECE that `calibrate` reported.
The classifier uses the temperature only for those scoring settings (loss, target, grid, weighting,
aggregation) and a timestep count within 4x of the fitted one, when no temperature is given; elsewhere
probabilities say "not calibrated". The weights, and so their sha256, are unchanged.
"""

import json
import sys
from pathlib import Path

from diffusion_classifier.adapters.loading import builtin_model_dir
from diffusion_classifier.store import ResultsStore
from diffusion_classifier.tasks.calibration import CALIBRATION_FILE


def store(name: str, run_dir: Path) -> dict:
    fitted = json.loads((run_dir / CALIBRATION_FILE).read_text())
    results = ResultsStore(run_dir)
    try:
        config = results.config()
    finally:
        results.close()
    block = {"temperature": fitted["temperature"],
             "fitted_on": {"data": config["data"], "split": config["split"],
                           "images": fitted["fit_images"] + fitted["held_out_images"],
                           "fit_images": fitted["fit_images"], "strategy": config["strategy"],
                           "prompts": config["prompts"], "seed": config["seed"],
                           # the settings a temperature holds for (classifier.stored_temperature_applies)
                           "scoring": {k: config.get(k) for k in ("loss", "target", "grid", "weighting", "aggregate")}},
             "held_out": {"images": fitted["held_out_images"], "before": fitted["before"], "after": fitted["after"]}}
    path = builtin_model_dir(name) / "model_index.json"
    index = json.loads(path.read_text())
    index["calibration"] = block
    path.write_text(json.dumps(index, indent=2) + "\n")
    return block


if __name__ == "__main__":
    print(json.dumps(store(sys.argv[1], Path(sys.argv[2])), indent=2))
