"""napari plugin (the optional extra ``cellst[napari]``): an npe2 reader that opens cellst's
OME-Zarr exports and cellst stores as image and labels layers (see :mod:`.reader`)."""
