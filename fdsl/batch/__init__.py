"""`fdsl batch`: scoring an archive of images on Ray Data (local cores or a cluster), every input exactly once.

`inputs` lists and identifies the inputs, `stages` holds the per-batch work (plain callable classes, no Ray),
`job` runs them on Ray Data and keeps the output table. Ray is imported only by `job`, when a job starts.
"""
