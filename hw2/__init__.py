"""Everything beyond the homework's four modules: data, checkpoints, images, configuration."""
