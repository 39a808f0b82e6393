"""`fdsl export --detector part.fdsl --format openvino|onnx --out DIR [--precision fp16|int8 --calib_normal DIR]`.

Writes one graph (preprocessed images -> anomaly map and score; banks inside) and its contract JSON; see
`fdsl.inspect.export`. `python -m fdsl.deploy --model DIR ...` or `fdsl predict --detector DIR ...` run it.
Bad input prints one line ``error: ...`` and exits with status 2.
"""
from __future__ import annotations

import logging
import sys
from collections.abc import Sequence

from fdsl.errors import FDSLError


def main(argv: Sequence[str] | None = None) -> int:
    """Run the export; 0 on success, 2 on bad input, 130 on Ctrl-C."""
    from fdsl.config import ExportConfig, parse_config
    from fdsl.io import setup_logging

    try:
        try:
            cfg = parse_config(ExportConfig, argv, __doc__.split("\n\n")[0], prog="fdsl export")
        except SystemExit as exc:  # argparse: --help (0) or a usage error (2)
            return int(exc.code or 0)
        setup_logging(None)
        from fdsl.cli.inspection import with_preset_weights

        with_preset_weights(cfg)
        from fdsl.config import RuntimeConfig
        from fdsl.inspect.detector import Detector
        from fdsl.inspect.export import export_detector
        from fdsl.io import prepare_run_dir

        prepare_run_dir(cfg.out, "--out")  # before loading the detector and building the graph
        det = Detector.load(cfg.detector, runtime=RuntimeConfig(device="cpu", precision="fp32"),
                            pretrained=cfg.pretrained)
        int8 = dict(normal=cfg.calib_normal, anomalous=cfg.calib_anomalous, masks=cfg.calib_masks,
                    min_corr=cfg.int8_min_corr, max_auroc_drop=cfg.int8_max_auroc_drop)
        out = export_detector(det, cfg.out, cfg.format, cfg.precision, cfg.chunk_mb, int8)
    except FDSLError as exc:
        logging.getLogger("fdsl").debug("error details", exc_info=True)
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    print(f"exported: {out} ({cfg.format}, {cfg.precision}); run it with "
          f"`python -m fdsl.deploy --model {out} --images IN --out OUT`")
    return 0
