"""A job whose output holds what a terminal would act on: colours, a title, a clipboard write, a screen
clear and a cursor move; then more lines than a pipe holds. It needs no torch."""
print("\x1b[31mred\x1b[0m plain")
print("title \x1b]0;pwned\x07 clipboard \x1b]52;c;ZXZpbA==\x07 clear \x1b[2J move \x1b[5;5H end")
for line in range(20000):  # some 400 KB, more than a pipe holds
    print(f"line {line}")
