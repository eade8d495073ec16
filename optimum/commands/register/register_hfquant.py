"""`optimum-cli hfquant quantize|export|convert ...`: hfquant's commands under optimum's CLI.

optimum-cli loads every module of the ``optimum.commands.register`` namespace package (no
``__init__.py`` on the way, PEP 420) and registers the commands in its ``REGISTER_COMMANDS``.
This module stays light: hfquant itself is imported only when a command runs. The
arguments are those of ``hfquant <command>`` (see ``hfquant <command> --help``).
"""
import argparse

from optimum.commands.base import BaseOptimumCLICommand, CommandInfo


class _Forward(BaseOptimumCLICommand):
    """Runs ``hfquant <name> ARGS...`` with the arguments as given."""

    @staticmethod
    def parse_args(parser):
        parser.add_argument("hfquant_args", nargs=argparse.REMAINDER,
                            help="the arguments of the hfquant command of the same name")

    def run(self):
        from hfquant.cli import main

        argv = list(self.args.hfquant_args)
        rc = main([self.COMMAND.name, *argv])
        if rc:
            raise SystemExit(rc)


class QuantizeCommand(_Forward):
    pass


class ExportCommand(_Forward):
    pass


class ConvertCommand(_Forward):
    pass


class HfquantCommand(BaseOptimumCLICommand):
    COMMAND = CommandInfo(name="hfquant", help="hfquant: INT8/INT4 quantization for transformers (CPU kernels)")
    SUBCOMMANDS = (
        CommandInfo(name="quantize", help="quantize MODEL_DIR OUT_DIR [--bits 4 --group-size 128 --method rtn|gptq|awq"
                                          "|llm_int8|w8a8|kmeans ...]; see `hfquant quantize --help`",
                    subcommand_class=QuantizeCommand),
        CommandInfo(name="export", help="export MODEL_DIR OUT_DIR --format gptq|compressed-tensors",
                    subcommand_class=ExportCommand),
        CommandInfo(name="convert", help="convert IN_DIR OUT_DIR: a GPTQ, AWQ or compressed-tensors checkpoint to "
                                         "hfquant", subcommand_class=ConvertCommand),
    )


REGISTER_COMMANDS = [HfquantCommand]
