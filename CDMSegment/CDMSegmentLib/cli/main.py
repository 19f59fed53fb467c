"""The ``cdmsegment`` command line: a thin parser over the same functions the Python API exposes.

``segment`` and ``info`` live in segment_command.py (the Slicer module runs them in a child process
without the rest); training and evaluation commands in their own modules. Everything is imported inside
``main``, so that a Ctrl-C at any moment after Python starts ends in one line, never a traceback.
"""

import sys
from typing import List, Optional


def build_parser():
    from .cohort import add_segment_cohort_parser
    from .evaluation_commands import (add_calibrate_refinement_parser, add_evaluate_parser,
                                      add_evaluate_volumes_parser)
    from .ood_commands import add_calibrate_ood_parser, add_ood_parser
    from .segment_command import SEGMENT_COMMANDS, make_parser
    from .training_commands import (add_calibrate_parser, add_ensemble_parser, add_export_parser, add_phantom_parser,
                                    add_set_defaults_parser, add_slices_parser, add_train_classifier_parser,
                                    add_train_parser)

    return make_parser(SEGMENT_COMMANDS + [add_segment_cohort_parser, add_phantom_parser, add_slices_parser,
                                           add_train_parser, add_export_parser, add_ensemble_parser, add_calibrate_parser,
                                           add_set_defaults_parser, add_train_classifier_parser, add_evaluate_parser,
                                           add_evaluate_volumes_parser, add_calibrate_refinement_parser, add_ood_parser,
                                           add_calibrate_ood_parser])


def main(argv: Optional[List[str]] = None) -> int:
    try:
        parser = build_parser()
        from .segment_command import run_command
    except KeyboardInterrupt:
        print("cdmsegment: interrupted while starting; nothing was done", file=sys.stderr)
        return 130
    return run_command(parser, argv)


if __name__ == "__main__":
    sys.exit(main())
