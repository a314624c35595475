#!/usr/bin/env bash
# The paper's experiments on ISIC in one command: the same grids (GRID=paper | study), seeds and eval as train_chestx.sh
# (see its header for every setting), with ISIC's data (RGB, FedDetect decay 0.9).
#
#   bash train_isic.sh                         # the paper: 256 px, 200 rounds (a GPU); data/isic by default
#   QUICK=1 bash train_isic.sh                 # CPU-sized, on the embedded lesion-like RGB set
#   QUICK=1 DATA_ROOT=../shared/data/isic bash train_isic.sh      # CPU-sized, on real ISIC images
set -euo pipefail
DATASET=isic exec bash "$(dirname "$0")/train_chestx.sh" "$@"
