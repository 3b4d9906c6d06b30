module aegisbench/goproxy

go 1.19
