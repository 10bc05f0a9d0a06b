"""Fuzz manifest parsing: any bytes give manifests or one ManifestError, never anything else.

    corpus=$(mktemp -d) && cp deploy/examples/article/*.yaml "$corpus" &&
    .venv/bin/python -m fuzz.fuzz_manifests -max_total_time=60 -artifact_prefix=/tmp/ "$corpus"

libFuzzer adds what it finds to the corpus folder: give it a scratch copy of the seeds.
"""

from __future__ import annotations

import sys

import atheris  # type: ignore[import-untyped]

with atheris.instrument_imports():
    from controller.manifests import ManifestError, _decode, load_text


def test_one_input(data: bytes) -> None:
    try:
        load_text(_decode(data, "fuzz.yaml"), "fuzz.yaml")
    except ManifestError as error:
        if "\n" in str(error).strip():
            raise AssertionError(f"error spans several lines: {error!r}") from None


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
