"""Running the ``ddpm-jax`` command inside a test (shared by the CLI tests; not a test file)."""

from ddpm_jax import cli


def run_cli(argv, capsys):
    """(exit status, stdout, stderr) of ``ddpm-jax argv``."""
    try:
        status = cli.main(argv)
    except SystemExit as exit_:
        status = exit_.code
    out, err = capsys.readouterr()
    return status, out, err
