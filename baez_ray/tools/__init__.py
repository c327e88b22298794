"""Tools around the jobs: SAE training with sae-lens (`train_sae.py`) and Ray Jobs
submission to a cluster (`submit.py`)."""
