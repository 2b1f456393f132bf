"""The `hybridserve` command line."""
import typer

app = typer.Typer(help="hybridserve", no_args_is_help=True)


@app.command()
def version() -> None:
    """Print the version."""
    from hybridserve import __version__
    typer.echo(__version__)
