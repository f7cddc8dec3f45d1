"""Migration from other tools' configurations to sdtrain recipes (torch-free)."""
