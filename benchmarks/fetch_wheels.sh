#!/usr/bin/env bash
# Download, here (with network), the wheels that the GPU machine's image lacks, into .whl/ for
# carrying there: the server's packages (glmrt[serve]) for bench-serve, llguidance for structured
# outputs, jsonschema (and its dependencies) for the GPU tests that validate them, pypdfium2 for glmrt
# parse (bench-documents; the glmocr SDK beside it needs PyMuPDF and OpenCV, 130 MB, over the
# carry limit: that comparison runs where the image has them). gpu_suite.sh installs
# whatever .whl/ holds before its steps. Target: CPython 3.12 on x86-64 Linux (the GPU image).
set -euo pipefail
cd "$(dirname "$0")/.."
PACKAGES=(fastapi==0.165.0 starlette==1.10.0 pydantic==2.13.4 pydantic-core==2.46.4 annotated-types==0.7.0
          typing-inspection==0.4.2 uvicorn==0.54.0 opentelemetry-api==1.45.2 llguidance==1.9.1
          jsonschema==4.25.1 jsonschema-specifications==2025.9.1 referencing==0.37.0 rpds-py==0.30.0 attrs==25.4.0
          pypdfium2==5.15.2)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_31_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "${PACKAGES[@]}"
ls -l .whl
