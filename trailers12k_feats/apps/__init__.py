"""Using results: genres of new videos (`predict`), reports and plots (`report`, `plots`),
embedding exploration for notebooks (`explore`) and the end-to-end `demo`."""
