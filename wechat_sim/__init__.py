"""A local stand-in for WeChat's servers (mini-program APIs and WeChat Pay v3) speaking the real protocols."""
from wechat_sim.keys import SimCredentials, generate_credentials, load_or_create_credentials

__all__ = ["SimCredentials", "generate_credentials", "load_or_create_credentials"]
