"""Deprecated alias (one release): the ``jacobian`` command is :mod:`toolkit.cli.jacobian`; the work it
does is :func:`toolkit.jacobian.run.run_jacobian`, its terminal text :func:`toolkit.jacobian.report.format_summary`."""
import warnings

from toolkit.cli.jacobian import add_parser as add_jacobian_parser
from toolkit.cli.jacobian import parse_target
from toolkit.cli.jacobian import run as cmd_jacobian
from toolkit.jacobian.report import format_summary
from toolkit.jacobian.run import DEFAULT_PROMPT, run_jacobian
from toolkit.jacobian.run import jacobian_pair as compute_pair

warnings.warn("toolkit.jacobian.cli_command is deprecated: use toolkit.jacobian.run.run_jacobian "
              "(and toolkit.cli.jacobian for the command).", DeprecationWarning, stacklevel=2)

__all__ = ["DEFAULT_PROMPT", "add_jacobian_parser", "cmd_jacobian", "compute_pair", "format_summary",
           "parse_target", "run_jacobian"]
