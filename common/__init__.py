"""The ground floor: what every layer needs and nothing of the project's own.

    errors   UserError, the one exception a user sees, and `require` for optional packages
    files    atomic writes, locks beside an output folder, free-space checks, the debris of killed runs, hashes
    peaks    host and GPU memory peaks, stage by stage, and giving memory back between stages

export/, engine/, runtime/ and the app package (zimage_trt: CLI, server, bench, parity) import it; it imports
none of them (tests/test_layers.py checks).
"""
