"""Attribution: a membership test and full-text search over the training data."""
