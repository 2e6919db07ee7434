"""Where images come from: labelled datasets, URL lists, archives and query images at an address."""
