#!/usr/bin/env bash
# Fetch (or build) a data set into DEST/data/<name>.
#
#   bash data_download.sh faces [DEST]       offline: render the synthetic faces (32x32, factors, masks) -> DEST/data/faces
#   bash data_download.sh digits [DEST]      offline: scikit-learn's bundled 8x8 digits -> DEST/data/digits
#   bash data_download.sh celeba_hq [DEST]   CelebA-HQ 256 (Google Drive, needs gdown)  -> DEST/data/celeba_hq
#   bash data_download.sh afhq [DEST] [URL]  AFHQ (StarGAN v2's release; URL overrides)  -> DEST/data/afhq
#
# DEST defaults to the current folder. Set PYTHON to choose the interpreter (default: ./.venv/bin/python if
# present, else python, else python3).
set -euo pipefail

usage() {
    echo "usage: bash data_download.sh {faces|digits|celeba_hq|afhq} [DEST] [URL]" >&2
    echo "  faces      render the synthetic faces offline (32x32 RGB, every factor known, part masks, attributes)" >&2
    echo "  digits     build the bundled handwritten-digits set offline (16x16, train/test split, attributes)" >&2
    echo "  celeba_hq  download CelebA-HQ 256 (Google Drive id ${CELEBA_HQ_ID}) with gdown" >&2
    echo "  afhq       download AFHQ from StarGAN v2's release (or from URL, a Drive id/URL or http(s) link)" >&2
}

CELEBA_HQ_ID="1R72NB79CX0MpnmWSli2SMu-Wp-M0xI-o"
AFHQ_URL_DEFAULT="https://www.dropbox.com/s/t9l9o3vsx2jai3z/afhq.zip?dl=1"

if [[ $# -lt 1 ]]; then
    usage
    exit 2
fi
NAME="$1"
DEST="${2:-.}"
DATA="${DEST%/}/data"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
if [[ -z "${PYTHON:-}" ]]; then
    # The repository's virtual environment (the README's setup) first, then whatever python is on PATH.
    if [[ -x "$HERE/.venv/bin/python" ]]; then PYTHON="$HERE/.venv/bin/python"
    elif command -v python >/dev/null 2>&1; then PYTHON=python; else PYTHON=python3; fi
fi

fail() {
    echo "error: $*" >&2
    exit 1
}

fetch_gdrive() {  # fetch_gdrive ID_OR_URL OUTPUT
    command -v gdown >/dev/null 2>&1 || fail "gdown is not installed (pip install gdown); or download $1 by hand to $2"
    gdown "$1" -O "$2.part" \
        || fail "could not download Google Drive file $1 (offline, or Drive refused); download it by hand to $2"
    mv "$2.part" "$2"
}

fetch_http() {  # fetch_http URL OUTPUT
    if command -v curl >/dev/null 2>&1; then
        curl -fsSL -o "$2.part" "$1" || fail "could not download $1 (offline?); download it by hand to $2"
    elif command -v wget >/dev/null 2>&1; then
        wget -O "$2.part" "$1" || fail "could not download $1 (offline?); download it by hand to $2"
    else
        fail "neither curl nor wget is installed; download $1 by hand to $2"
    fi
    mv "$2.part" "$2"
}

unpack() {  # unpack ZIP FOLDER
    command -v unzip >/dev/null 2>&1 || fail "unzip is not installed; unpack $1 into $2 by hand"
    unzip -q -o "$1" -d "$2" || fail "$1 is not a complete zip archive; delete it and run again"
    rm -f "$1"
}

case "$NAME" in
    faces)
        mkdir -p "$DATA"
        DATA_ABS="$(cd "$DATA" && pwd)"  # the renderer runs from the repository (python -m), so the path must not be relative
        (cd "$HERE" && "$PYTHON" -m scripts.make_faces "$DATA_ABS")
        ;;
    digits)
        mkdir -p "$DATA"
        "$PYTHON" "$HERE/scripts/make_digits.py" "$DATA"
        ;;
    celeba_hq)
        mkdir -p "$DATA"
        ZIP="$DATA/celeba_hq_raw.zip"
        [[ -f "$ZIP" ]] || fetch_gdrive "$CELEBA_HQ_ID" "$ZIP"
        unpack "$ZIP" "$DATA"
        echo "CelebA-HQ is in $DATA"
        ;;
    afhq)
        mkdir -p "$DATA"
        ZIP="$DATA/afhq.zip"
        URL="${3:-$AFHQ_URL_DEFAULT}"
        if [[ ! -f "$ZIP" ]]; then
            if [[ "$URL" == http*drive.google.com* || "$URL" != http* ]]; then
                fetch_gdrive "$URL" "$ZIP"
            else
                fetch_http "$URL" "$ZIP"
            fi
        fi
        unpack "$ZIP" "$DATA"
        echo "AFHQ is in $DATA/afhq (the dog images used by the afhq config are in train/dog and val/dog)"
        ;;
    *)
        echo "error: unknown data set '$NAME' (choices: digits, celeba_hq, afhq)" >&2
        usage
        exit 2
        ;;
esac
