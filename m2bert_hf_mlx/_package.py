"""Facts about the installed package that every layer may read: its version and the model folder it ships."""

from pathlib import Path

__version__ = "0.1.0"

# A small M2-BERT MLM trained by this package (recipes/demo_model/train_demo_model.py); its README.md says how well
# it does.
DEMO_MODEL = Path(__file__).parent / "demo_model"
