#include "cmdline.h"

#include <cstdlib>
#include <fstream>
#include <iostream>
#include <iterator>
#include <map>
#include <optional>

namespace masquerade::cmdline {
namespace {

const std::map<std::string, v1::Method> kMethods = {
    {"reverse_personalization", v1::REVERSE_PERSONALIZATION},
    {"blur", v1::BLUR},
    {"pixelate", v1::PIXELATE},
    {"solid", v1::SOLID},
};

// The first non-empty line of the token file.
std::string ReadToken(const std::string& path) {
  std::ifstream in(path);
  if (!in) throw UsageError("--token-file: cannot read " + path);
  for (std::string line; std::getline(in, line);) {
    const auto begin = line.find_first_not_of(" \t\r");
    if (begin == std::string::npos) continue;
    return line.substr(begin, line.find_last_not_of(" \t\r") - begin + 1);
  }
  throw UsageError("--token-file " + path + ": the file holds no token");
}

}  // namespace

std::vector<std::string> ParseCommandLine(int argc, char** argv, const char* usage, CommonArgs& common,
                                          const OwnOption& own) {
  std::vector<std::string> positional;
  for (int i = 1; i < argc; ++i) {
    std::string arg = argv[i];
    std::optional<std::string> inline_value;
    if (arg.rfind("--", 0) == 0 && arg.find('=') != std::string::npos) {
      inline_value = arg.substr(arg.find('=') + 1);
      arg = arg.substr(0, arg.find('='));
    }
    const std::function<std::string()> value = [&]() -> std::string {
      if (inline_value) return *inline_value;
      if (i + 1 >= argc) throw UsageError(arg + " needs a value");
      return argv[++i];
    };
    if (arg == "-h" || arg == "--help") {
      std::cout << usage << "\n";
      std::exit(0);
    } else if (arg == "--server") {
      common.server = value();
    } else if (arg == "--method") {
      const std::string name = value();
      const auto found = kMethods.find(name);
      if (found == kMethods.end()) throw UsageError("--method " + name + ": use one of blur, pixelate, solid, reverse_personalization");
      common.method = found->second;
    } else if (arg == "--timeout") {
      common.timeout_seconds = ParsePositive(arg, value(), " of seconds");
    } else if (arg == "--tls") {
      common.tls = true;
    } else if (arg == "--tls-ca") {
      common.tls_ca = value();
    } else if (arg == "--tls-cert") {
      common.tls_cert = value();
    } else if (arg == "--tls-key") {
      common.tls_key = value();
    } else if (arg == "--token-file") {
      common.token_file = value();
    } else if (own(arg, value)) {
    } else if (arg.rfind("--", 0) == 0) {
      throw UsageError("unknown option " + arg);
    } else {
      positional.push_back(arg);
    }
  }
  if (common.server.empty()) throw UsageError("--server HOST:PORT is required");
  if (common.tls_cert.empty() != common.tls_key.empty()) {
    throw UsageError("--tls-cert and --tls-key: give both (mutual TLS) or neither");
  }
  return positional;
}

unsigned ParseUnsigned(const std::string& flag, const std::string& text, unsigned minimum, const std::string& expected) {
  try {
    size_t used = 0;
    const long value = std::stol(text, &used);
    if (used == text.size() && value >= static_cast<long>(minimum)) return static_cast<unsigned>(value);
  } catch (const std::exception&) {
  }
  throw UsageError(flag + " " + text + ": use " + (expected.empty() ? "an integer >= " + std::to_string(minimum) : expected));
}

double ParsePositive(const std::string& flag, const std::string& text, const std::string& unit) {
  double value = -1;
  try {
    value = std::stod(text);
  } catch (const std::exception&) {
  }
  if (!(value > 0)) throw UsageError(flag + " " + text + ": use a positive number" + unit);
  return value;
}

std::string ReadFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error("cannot read " + path);
  return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

Connection ConnectionFor(const CommonArgs& common) {
  Connection connection;
  connection.options.timeout = std::chrono::milliseconds(static_cast<long long>(common.timeout_seconds * 1000));
  connection.options.tls = common.tls;
  connection.options.ca_file = common.tls_ca;
  connection.options.cert_file = common.tls_cert;
  connection.options.key_file = common.tls_key;
  if (!common.token_file.empty()) connection.options.token = ReadToken(common.token_file);
  connection.credentials = ChannelCredentialsFor(connection.options);  // reads the PEM files now
  return connection;
}

int ExitCodeOf(const std::function<int()>& body) {
  try {
    return body();
  } catch (const RpcError& e) {
    std::cerr << "error: " << e.code_name() << ": " << e.message() << "\n";
    return e.code() == grpc::StatusCode::INVALID_ARGUMENT ? 3 : 1;
  } catch (const std::exception& e) {
    std::cerr << "error: " << e.what() << "\n";
    return 1;
  }
}

}  // namespace masquerade::cmdline
