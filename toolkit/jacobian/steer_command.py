"""Deprecated alias (one release): the ``steer`` command is :mod:`toolkit.cli.steer`; the default layer is
:func:`toolkit.jacobian.steering.default_steering_boundary`, the report ``SteeringResult.report(path)`` and the
terminal text :func:`toolkit.jacobian.steering_report.format_summary`."""
import warnings

from toolkit.cli.steer import DEFAULT_CONCEPT, DEFAULT_PROMPT, parse_floats, parse_ints
from toolkit.cli.steer import add_parser as add_steer_parser
from toolkit.cli.steer import run as cmd_steer
from toolkit.jacobian.steering import default_steering_boundary as default_layer
from toolkit.jacobian.steering_report import format_summary

warnings.warn("toolkit.jacobian.steer_command is deprecated: use toolkit.jacobian.steering.steering_sweep and "
              "SteeringResult.report (and toolkit.cli.steer for the command).", DeprecationWarning, stacklevel=2)

__all__ = ["DEFAULT_CONCEPT", "DEFAULT_PROMPT", "add_steer_parser", "cmd_steer", "default_layer", "format_summary",
           "parse_floats", "parse_ints"]
