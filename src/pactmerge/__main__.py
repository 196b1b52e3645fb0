from pactmerge.cli import app

app()
