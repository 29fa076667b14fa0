


def forward(self, x : _torch_Tensor_) -> _torch_Tensor_:
    ss_x = self.ss_x(x);  x = None
    input_drop = self.input_drop(ss_x);  ss_x = None
    features_0 = getattr(self.features, "0")(input_drop);  input_drop = None
    features_1 = getattr(self.features, "1")(features_0);  features_0 = None
    ss_features_1 = self.ss_features_1(features_1);  features_1 = None
    features_2 = getattr(self.features, "2")(ss_features_1);  ss_features_1 = None
    features_3 = getattr(self.features, "3")(features_2);  features_2 = None
    ss_features_3 = self.ss_features_3(features_3);  features_3 = None
    features_4 = getattr(self.features, "4")(ss_features_3);  ss_features_3 = None
    features_5 = getattr(self.features, "5")(features_4);  features_4 = None
    ss_features_5 = self.ss_features_5(features_5);  features_5 = None
    features_6 = getattr(self.features, "6")(ss_features_5);  ss_features_5 = None
    features_7 = getattr(self.features, "7")(features_6);  features_6 = None
    features_8 = getattr(self.features, "8")(features_7);  features_7 = None
    ss_features_8 = self.ss_features_8(features_8);  features_8 = None
    features_9 = getattr(self.features, "9")(ss_features_8);  ss_features_8 = None
    features_10 = getattr(self.features, "10")(features_9);  features_9 = None
    ss_features_10 = self.ss_features_10(features_10);  features_10 = None
    features_11 = getattr(self.features, "11")(ss_features_10);  ss_features_10 = None
    features_12 = getattr(self.features, "12")(features_11);  features_11 = None
    features_13 = getattr(self.features, "13")(features_12);  features_12 = None
    features_14 = getattr(self.features, "14")(features_13);  features_13 = None
    features_15 = getattr(self.features, "15")(features_14);  features_14 = None
    features_16 = getattr(self.features, "16")(features_15);  features_15 = None
    features_17 = getattr(self.features, "17")(features_16);  features_16 = None
    features_18 = getattr(self.features, "18")(features_17);  features_17 = None
    pool = self.pool(features_18);  features_18 = None
    flatten = torch.flatten(pool, 1);  pool = None
    return flatten
    