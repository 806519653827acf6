"""four-eyes: a release needs an approval by someone other than its author."""
