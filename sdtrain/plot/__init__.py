"""Pictures of runs and benches (matplotlib, an optional extra: `pip install 'sdtrain[plot]'`)."""
