"""Random-access readers of public datasets in their official layouts (one module per dataset)."""
