


def forward(self, x : _torch_Tensor_) -> _torch_Tensor_:
    ss_x = self.ss_x(x);  x = None
    layers_0 = getattr(self.layers, "0")(ss_x);  ss_x = None
    layers_1 = getattr(self.layers, "1")(layers_0);  layers_0 = None
    layers_2 = getattr(self.layers, "2")(layers_1);  layers_1 = None
    layers_3 = getattr(self.layers, "3")(layers_2);  layers_2 = None
    ss_layers_3 = self.ss_layers_3(layers_3);  layers_3 = None
    layers_4 = getattr(self.layers, "4")(ss_layers_3);  ss_layers_3 = None
    layers_5 = getattr(self.layers, "5")(layers_4);  layers_4 = None
    ss_layers_5 = self.ss_layers_5(layers_5);  layers_5 = None
    layers_6 = getattr(self.layers, "6")(ss_layers_5);  ss_layers_5 = None
    return layers_6
    