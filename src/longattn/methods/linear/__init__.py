"""Linear / recurrent attention layers: one file, one registered nn.Module each (see base.LinearLayer)."""
