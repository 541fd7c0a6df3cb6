"""Other ways into the feature cache: the authors' released features (`download`, `unpack`,
`zarr_import`) and synthetic corpora (`synthetic` for features, `synthvideo` for videos)."""
