"""The `fedtransfer` command line: the one package that may import server/, client/, common/ and deploy/."""
