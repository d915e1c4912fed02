"""The data: sources, preparation, the prepared store, sequence windows, teacher samples and candidates."""
