"""Using a trained model: loading it from a run or checkpoint folder, chatting, playing,
evaluating and exporting it. Imports the folders below (training/ for the device and autocast
rules it shares); never bench/, ui/ or cli/."""
