"""An edit drawn for people: loss/metric plots (`plots`) and the web view's heat map and text (`view`)."""

